"""The configuration: model.py, the values every layer reads; load.py, YAML and flags into them, with errors that name the key."""
