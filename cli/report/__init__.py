"""Presentation of the registry: the HTML page (`page`, Jinja `templates/`), its lineage graph
(`lineage`) and loss charts drawn by matplotlib (`plots`). Reads entries; stores nothing."""
