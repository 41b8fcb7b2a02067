"""The single-node trainer: RSO/DPO/SLiC/IPO optimisation of a policy on pipeline pairs.

Entry points: ``trainer.train.main(argv)`` (``rso train``) and ``trainer.train.train(cfg)`` with a
``trainer.config.TrainConfig``; the SPEC 6 losses are ``trainer.losses.preference_loss``.
Nothing here imports Apache Beam.
"""
