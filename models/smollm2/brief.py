"""A rule judge for SmolLM2's rounds (``judge.rule: models/smollm2/brief.py``): a complete answer over one cut
off at the token limit, and between two of a kind the shorter, unless they are within a tenth of each other's
length (a tie, not trained on). It asks for brevity and nothing else: it cannot tell a right answer from a
wrong one, which is what a rule on a laptop can do, and what the held-out report then measures."""

ENDINGS = (".", "!", "?", '"', "'", ")", "`", "*")


def _complete(answer: str) -> bool:
    return answer.rstrip().endswith(ENDINGS)


def prefer(prompt: str, a: str, b: str) -> str:
    complete_a, complete_b = _complete(a), _complete(b)
    if complete_a != complete_b:
        return "a" if complete_a else "b"
    words_a, words_b = len(a.split()), len(b.split())
    if words_a == 0 or words_b == 0:  # an empty answer never wins
        return "tie" if words_a == words_b else ("b" if words_a == 0 else "a")
    if abs(words_a - words_b) <= 0.1 * max(words_a, words_b):
        return "tie"
    return "a" if words_a < words_b else "b"
