"""The workflow's steps: one function per rule's science, called by the thin ``scripts/*.py``.

* :mod:`.vision` -- the vision experiments (Section 4.1, Figure 1, Table 3, Figures 5-6);
* :mod:`.llm` -- the language-model experiment (Section 4.2, Appendix C);
* :mod:`.blackbox` -- the black-box backdoor study (Section 5, Appendix D);
* :mod:`.mislabel` -- mislabelled-example detection by self-influence;
* :mod:`.study` -- the quality landscape (DAUNCE's LDS against compute over its settings).

Each takes the typed settings and paths and writes its outputs atomically, so every step runs
(and is tested) without Snakemake. Steps import the library; no library module imports a step.
"""
