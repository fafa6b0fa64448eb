"""Precision routing: one model at several precisions, mixed-precision policies, draft-gate-escalate runs.

`switch.RoutedModel` holds the base weights once plus one packed state per precision and switches per call;
`policy` says which precision each layer runs at (per expert, step range, block) and the escalation ladder;
`route` drafts, gates on identity and escalates (`vidquant route`); `gate` is the prompt gate (rules as data).
"""

from vidquant.route.policy import MIXED, MixPlan, Policy, load_policy, parse_policy, policy_names
from vidquant.route.switch import BF16, PrecisionCost, RoutedLinear, RoutedModel

__all__ = ["BF16", "MIXED", "MixPlan", "Policy", "PrecisionCost", "RoutedLinear", "RoutedModel", "load_policy",
           "parse_policy", "policy_names"]
