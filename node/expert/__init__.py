"""The expert role's parts: the worker that trains HDEE domain experts, the catalogue keeper, where an expert's
weights start (seeds), the expert directory in the DHT, and FetchExpert.
"""
