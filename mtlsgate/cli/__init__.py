"""The mtlsgate command: demo, ca, check, tac."""
