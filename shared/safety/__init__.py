"""The desk's safety rules: limits, protections, deferred intents, symbols, trading state, account
activity, rate limits.
"""
