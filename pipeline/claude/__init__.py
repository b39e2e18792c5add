"""The Claude client: ``client`` makes each call through the official SDK and classifies its
errors; ``ratelimit`` keeps the tiers' shared budgets in Redis; ``pricing`` turns usage into cost;
``testhooks`` holds the fault injection that only the fault tests switch on."""
