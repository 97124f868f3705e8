"""Model code that tiny test checkpoints ship as their own remote code (saved next to the weights with
`register_for_auto_class`, loaded back with trust_remote_code), shaped like real published checkpoints."""
