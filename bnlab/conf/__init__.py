"""bnlab's Hydra config tree as package data (Hydra's config source pkg://bnlab.conf): train.yaml and
the groups model/, data/, study/, hydra/launcher/. A project's own ./conf adds groups beside it."""
