"""The report: what the study found, beside the paper's numbers.

- ``figures``   — every figure, drawn from arrays (matplotlib Agg; no Ray, no storage);
- ``probes``    — the probe tables and Figure 8 from the probe stage's rows;
- ``published`` — the paper's numbers, each with the table it comes from;
- ``content``   — reads a results root and assembles the report's sections (``scope-ray report``);
- ``document``  — writes the sections as Markdown and self-contained HTML.
"""
