"""BLEU and chrF of translations, by sacreBLEU (the `[mt]` extra): the scores and signatures
its command line prints for the same hypotheses and references (`sacrebleu REF -i HYP -m bleu
chrf`), so that a figure trainrun reports is comparable with any paper's that gives the
signature. Detokenized text on both sides, sacreBLEU's default 13a tokenization."""

from __future__ import annotations

from dataclasses import dataclass

from trainrun.errors import ConfigError

INSTALL = "pip install 'trainrun[mt]'"


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    sentences: int

    def line(self) -> str:
        return (f"BLEU {self.bleu:.2f} | chrF {self.chrf:.2f} over {self.sentences:,} sentences "
                f"(sacreBLEU {self.bleu_signature}; {self.chrf_signature})")


def require(key: str) -> None:
    """ConfigError naming `key` when sacreBLEU is not installed."""
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        raise ConfigError(key, f"BLEU needs sacreBLEU, which is not installed; allowed: "
                               f"{INSTALL}") from None


def score(hypotheses: list[str], references: list[str]) -> Scores:
    """Corpus BLEU and chrF of the hypotheses against one reference each."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return Scores(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()),
                  len(hypotheses))
