"""The YAML configs (model sizes, training, sampling), shipped with the package so that a
wheel install finds them: ``model.config.load_config("tiny")`` reads ``configs/tiny.yaml``."""
