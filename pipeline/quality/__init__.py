"""What routing costs in quality: agreement of a routed answer with the reference tier's
(``agreement``), and the estimators over a sample of them (``estimate``). Plain functions, tested
without a database or a model."""
