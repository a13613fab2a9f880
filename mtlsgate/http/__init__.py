"""The gateway's own HTTP/1.1 engine: the server protocol on llhttp (httptools) and the upstream client."""
