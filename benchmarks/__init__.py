"""logitkit benchmark and accuracy harness (run through the ``logitkit`` command: ``bench``, ``accuracy``)."""
