"""The training run itself: record it (:mod:`.recording`), replay it (:mod:`.replay`), differentiate through it
(:mod:`.metagradient`) and name what keeps that derivative from describing removals (:mod:`.smoothness`); the
attributors built on it are :class:`datatrace.Metagradient` and :class:`datatrace.RecordedTracIn`."""
