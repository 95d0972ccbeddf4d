"""Topic-based Subscriptions: topics, matching the change log, delivering notifications."""
