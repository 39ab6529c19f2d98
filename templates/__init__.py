"""Dataflow Flex Templates: one directory per job, generated from the job's PipelineOptions.

``templates/<job>/metadata.json`` and ``templates/<job>/main.py`` are written by
``python -m templates.metadata --write`` and verified by ``--check``; the image
(``templates/Dockerfile``) and the deploy steps (``templates/deploy.sh``) are
described in ``docs/deploy.md``.
"""
