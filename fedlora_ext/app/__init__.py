"""The application: what a user runs (``fedlora ...``) on top of the library.

``cli`` parses the command line; ``jobs`` runs ``fedlora run`` / ``simulate`` / ``compare``; ``run_folder``
owns a run's folder (claiming, locking, status); ``reporting`` writes its summary, tables and plots;
``run_models`` rebuilds a finished run's models, which ``export`` writes out and ``evaluation`` scores;
``selfcheck`` checks the installed ops. Nothing in the library imports from here, except that Flower's
ServerApp writes the same run folder through ``run_folder`` and ``reporting``.
"""
