"""Example models that ship with edgemind, so the README's commands work after ``pip
install``: ``python -m edgemind.examples.toy models/toy`` builds the toy model."""
