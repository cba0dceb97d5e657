"""Does an answer state a target? The rule the evaluation scores answers by and editing verifies its edits by
(a neutral module: code that makes artifacts never imports the evaluation).

Tokens are rouge-score's (lower-cased alphanumeric words, Porter-stemmed); content tokens drop English
stopwords (bm25s' list)."""
from __future__ import annotations

MATCH_RECALL = 0.5


def _tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


# Tokens that only turn a statement to the second person and carry no answer ("You're" -> you, re): not content,
# or "Your food preference is vegetarian." would not state "You're vegetarian." (2 of {you, re, vegetarian} wanted).
PERSON_TOKENS = frozenset({"you", "your", "yours", "yourself", "re", "ve", "ll", "d", "m", "s", "i", "me", "my"})


def content_tokens(text: str) -> set[str]:
    """rouge-score's stemmed tokens of `text` less English stopwords (bm25s' list) and PERSON_TOKENS."""
    from bm25s.stopwords import STOPWORDS_EN

    return {t for t in _tokenizer().tokenize(text) if t not in STOPWORDS_EN and t not in PERSON_TOKENS}


def target_match(answer: str, targets: tuple[str, ...], others: tuple[str, ...] = ()) -> bool:
    """Does `answer` state one of `targets`? Words a target shares with `others` (other users' targets for the
    same question) do not count: "music" in "Jazz music" is not evidence against "Rap music"."""
    words = set(_tokenizer().tokenize(answer))
    shared = set().union(*map(content_tokens, others))
    for target in targets:
        tokens = content_tokens(target)
        wanted = tokens - shared
        if wanted and len(wanted & words) >= MATCH_RECALL * len(wanted):
            return True
        if tokens and not wanted and tokens <= words:  # a target of shared words only needs all of them
            return True
    return False
