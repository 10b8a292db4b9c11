"""Measuring a selection against dense attention: a RULER-style suite (:mod:`.ruler`) over offline
text (:mod:`.texts`)."""
