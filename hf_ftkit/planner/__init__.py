"""The memory planner: model specs, the analytic estimate, the FakeTensor trace, suggestions.

Data flows one way: ``spec`` / ``resolve`` describe the model, ``inputs`` the run, ``states`` and
``activations`` count bytes, ``estimate`` assembles a :class:`~hf_ftkit.planner.estimate.Plan`.
Nothing here knows about ``Trainer``; ``from_objects`` only reads its configuration objects.
"""
