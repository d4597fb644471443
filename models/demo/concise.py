"""A rule judge for the demo (``judge.rule: models/demo/concise.py``): its stated preference, a reply of one
to four words. A score rule: each answer gets a number, the higher one is preferred, equal scores tie."""


def score(prompt: str, answer: str) -> float:
    words = len(answer.split())
    return 1.0 if 0 < words <= 4 else 0.0
