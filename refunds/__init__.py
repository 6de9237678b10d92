"""The core every part shares: settings, money, the state machine, the store, the vault."""
