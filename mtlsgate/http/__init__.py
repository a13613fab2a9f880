"""The gateway's own HTTP/1.1 engine on httptools (llhttp): the downstream server protocol and the upstream client."""
