"""The training run itself: record it (:mod:`.recording`), replay it (:mod:`.replay`) and differentiate through it
(:mod:`.metagradient`); the attributors built on it are :class:`datatrace.Metagradient` and
:class:`datatrace.RecordedTracIn`."""
