"""``zimagekit serve``: a local web UI and HTTP APIs over one loaded pipeline.

:mod:`~zimagekit.serve.jobs` queues generations and runs them one at a time;
:mod:`~zimagekit.serve.app` is the FastAPI app (the page, zimagekit's job API with progress
events, A1111's ``/sdapi/v1`` and OpenAI's ``/v1/images/generations``). The command's flags
live in :mod:`zimagekit.cli.serve`.
"""
