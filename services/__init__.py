"""AEPO on Ray: rollout, learner, driver, data and the algorithm's math (`services.algorithm`)."""
