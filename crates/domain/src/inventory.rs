//! Inventory rules: stock arithmetic and the hold state machine.
