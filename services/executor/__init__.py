"""The order executor: approved orders to the broker, broker events to the portfolio."""
