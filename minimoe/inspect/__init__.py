"""Studying what a model does: routing traces (:mod:`.trace`) and the runs that make them (:mod:`.tracing`),
the analyses of the MoE literature (:mod:`.analysis`), plots (:mod:`.viz`), the HTML report (:mod:`.report`),
one token through one layer (:mod:`.stepthrough`), and parameter counts (:mod:`.params`)."""
