"""Each replica's sustainable throughput, learned online from its load reports.

A replica's measured tokens/s (prefill + decode) equals its capacity only when it is
saturated: requests queue (``waiting > 0``), its batch is full, or its KV cache is nearly
full. Those samples move an exponentially weighted average toward the measurement;
unsaturated samples only ever raise it (a replica can do at least what it just did).
The tier's estimate is the mean over the replicas that have one, and survives them, so a
tier scaled to zero still knows how much one replica can take when it comes back.
"""

from __future__ import annotations

from collections.abc import Iterable

from strata.autoscale.types import ReplicaSample
from strata.load import LoadReport


def is_saturated(report: LoadReport, saturation_kv_usage: float) -> bool:
    """True when the replica's throughput is limited by the replica, not by its load."""
    return (
        report.waiting > 0
        or (report.max_num_seqs > 0 and report.running >= report.max_num_seqs)
        or report.kv_usage >= saturation_kv_usage
    )


class CapacityEstimator:
    """EWMA of tokens/s each replica sustains at high utilization."""

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        saturation_kv_usage: float = 0.9,
        initial_tokens_per_s: float | None = None,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"capacity EWMA alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.saturation_kv_usage = saturation_kv_usage
        self._per_replica: dict[str, float] = {}
        self._tier: float | None = initial_tokens_per_s
        self.saturated_samples = 0

    def observe(self, replicas: Iterable[ReplicaSample]) -> None:
        """Fold one round of load reports into the estimates."""
        present: set[str] = set()
        for rep in replicas:
            if not rep.serving or rep.report is None:
                continue
            present.add(rep.replica_id)
            throughput = rep.report.prompt_tokens_per_s + rep.report.generation_tokens_per_s
            if throughput <= 0:
                continue
            estimate = self._per_replica.get(rep.replica_id)
            if is_saturated(rep.report, self.saturation_kv_usage):
                self.saturated_samples += 1
                if estimate is None:
                    # A new replica starts from the tier's belief, if there is one.
                    estimate = self._tier if self._tier is not None else throughput
                self._per_replica[rep.replica_id] = estimate + self.alpha * (throughput - estimate)
            elif estimate is not None and throughput > estimate:
                self._per_replica[rep.replica_id] = estimate + self.alpha * (throughput - estimate)
        for gone in set(self._per_replica) - present:
            del self._per_replica[gone]
        if self._per_replica:
            self._tier = sum(self._per_replica.values()) / len(self._per_replica)

    @property
    def tokens_per_s(self) -> float | None:
        """Estimated tokens/s one replica sustains; None until a saturated sample is seen."""
        return self._tier

    def replica_tokens_per_s(self, replica_id: str) -> float | None:
        """One replica's own estimate, if it has been saturated since it appeared."""
        return self._per_replica.get(replica_id)
