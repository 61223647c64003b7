"""Applications built on influence scores: explain predictions, debug data, value data, audit, attack.

Every function takes a *fitted* :class:`~datatrace.attributors.base.Attributor` (e.g.
:class:`datatrace.InfluenceFunction`) and uses only its contract (:mod:`datatrace.apps.common`), so it works the same
with every route; the scores keep the attributor's sign convention and units (:data:`datatrace.scores.MEANING`).

=========================  ===================================================================================
:func:`explain`            the strongest proponents and opponents of each query
:func:`debug_data`         self-influence, training loss and validation influence of every training example
:func:`detection_summary`  how many known-bad examples each ranking finds (self-influence, loss, random)
:func:`removal_check`      retrain without the top ``k`` of a ranking vs ``k`` random examples
:func:`value_data`         data values: the change of the total validation loss if each example is removed
:func:`fairness_audit`     which examples drive a gap between two groups (loss or positive rate)
:func:`memorisation_audit` outlying self-influence, and whether removal flips the example's own prediction
:func:`confirm_memorisation` retrain without flagged examples: does their own loss rise as estimated?
:func:`pbrf_response`      the proximal Bregman response (Bae et al. 2022), the target of influence on networks
:func:`attack`             Koh & Liang's training-set attack, verified by retraining
:func:`score_shortlist`    exact scores of each query's ``m`` most similar training examples only (TF-IDF,
                           embeddings, any similarity); :func:`shortlist_recall`: how much of the top-k it keeps
=========================  ===================================================================================
"""

from datatrace.apps.attack import AttackResult, attack, perturbation_direction
from datatrace.apps.audit import (
    FairnessAudit,
    MemorisationAudit,
    MemorisationCheck,
    confirm_memorisation,
    fairness_audit,
    memorisation_audit,
)
from datatrace.apps.debug import DebugResult, RemovalCheck, debug_data, detection_summary, removal_check
from datatrace.apps.explain import Explanation, explain
from datatrace.apps.pbrf import pbrf_response
from datatrace.apps.shortlist import (
    ShortlistRecall,
    ShortlistScores,
    embedding_similarity,
    score_shortlist,
    select_candidates,
    shortlist_recall,
    tfidf_similarity,
)
from datatrace.apps.value import DataValues, value_data

__all__ = [
    "AttackResult",
    "DataValues",
    "DebugResult",
    "Explanation",
    "FairnessAudit",
    "MemorisationAudit",
    "MemorisationCheck",
    "RemovalCheck",
    "ShortlistRecall",
    "ShortlistScores",
    "attack",
    "confirm_memorisation",
    "debug_data",
    "detection_summary",
    "embedding_similarity",
    "explain",
    "fairness_audit",
    "memorisation_audit",
    "pbrf_response",
    "perturbation_direction",
    "removal_check",
    "score_shortlist",
    "select_candidates",
    "shortlist_recall",
    "tfidf_similarity",
    "value_data",
]
