"""The running gateway: the twistd service maker, the service tree, listeners, workers, reload and file watching."""
