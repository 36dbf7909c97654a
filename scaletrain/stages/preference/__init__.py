"""Preference learning: the DPO family (DPO, IPO, hinge, SimPO, RPO), reward models (Bradley–Terry) and RLAIF pairs."""
