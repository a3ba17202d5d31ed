"""`fimtune data build`'s corpus: sources read (:mod:`.sources`, :mod:`.files`, :mod:`.notebooks`),
filtered (:mod:`.filters`, :mod:`.languages`), deduplicated (:mod:`.dedup`), split (:mod:`.split`) and
counted (:mod:`.stats`); :mod:`.build` runs them in that order."""
