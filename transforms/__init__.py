"""Beam PTransforms and DoFns: thin wiring over models/.

Beam's SDK worker logs every element it processes at DEBUG. Elements hold
e-mail addresses, which must never reach a log, so importing this package (the
launcher and every worker do) keeps that one logger at INFO whatever the root
level is.
"""
import logging

ELEMENT_LOGGERS = ("apache_beam.runners.worker.operations",)

for _name in ELEMENT_LOGGERS:
    logging.getLogger(_name).setLevel(logging.INFO)
