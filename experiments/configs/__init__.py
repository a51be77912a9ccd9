"""Configs: one ``get_config()`` file per reproduced setting (``--config FILE``)."""
