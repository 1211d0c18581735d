"""`python -m annotate audit`: a person's judgement of annotation runs, turned into numbers.

    sample.py    a seeded, stratified sample of the figures every run holds -> DIR/sample.json and the
                 sampled records of each run under DIR/runs/NAME/
    verdicts.py  the verdict file DIR/verdicts.jsonl: one line per (reviewer, figure), appended under a
                 lock and fsynced; read back with every unreadable line named
    server.py    `audit serve`: the review page on 127.0.0.1 (standard library http.server)
    page/        the page itself (HTML, JS, CSS; nothing fetched from the internet)
    stats.py     Wilson intervals, Newcombe's paired difference, Cohen's kappa
    report.py    `audit report`: shares per run, aspect and stratum, paired differences, agreement,
                 the figures judged wrong as a gallery; Markdown and JSON
"""

# What a reviewer judges of each run's annotation of a figure, in the page's order.
ASPECTS = ("panels", "labels", "caption_split", "regions")
ANSWERS = ("correct", "wrong", "unsure")
