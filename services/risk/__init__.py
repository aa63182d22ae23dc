"""The risk service: intents in, approved orders or rejections out (``python -m services.risk``)."""
