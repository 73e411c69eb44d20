"""Experiment configs: `<name>.py` holds `get_config(arg)`, arg = quick | small | paper."""
