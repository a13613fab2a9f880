# The mtlsgate deployment file (write it out with: mtlsgate tac > mtlsgate.tac).
# twistd -ny mtlsgate.tac  (reads $MTLSGATE_CONFIG, default ./mtlsgate.yaml)
import os

from twisted.application.service import Application
from twisted.internet import reactor

from mtlsgate.config.load import load_config
from mtlsgate.config.model import ConfigError
from mtlsgate.tls.pki import PKIError
from mtlsgate.app.service import fail, make_gateway

path = os.environ.get("MTLSGATE_CONFIG", "mtlsgate.yaml")
try:
    gateway = make_gateway(reactor, load_config(path), lambda: load_config(path))
except (ConfigError, PKIError) as e:
    fail(str(e))

application = Application("mtlsgate")
gateway.setServiceParent(application)
