"""Experiments built on the library, one layer above it: the paper's tables (`reproduce`, with its
`report`) and the README's `quickstart`. Nothing in the library imports from here."""
