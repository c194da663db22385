"""What every Tributary service shares: settings, the app factory, health, migrations."""
