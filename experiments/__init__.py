"""The paper tables, one folder each (`<paper>/<table>/`): the sweep configs (Hydra `experiment=<name>`), the table
spec (`table.yaml`: methods, columns and their results.json sources, published cells) and the protocol card
(`protocol.md`). Installed as the package data `lightning_ralora.experiments`."""
