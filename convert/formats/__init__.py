"""The only code that reads or writes checkpoint bytes, one module per format."""
