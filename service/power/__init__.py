"""Power and latency budgets: power readings (sysfs or an energy model), budgets per vehicle mode and skill,
and the governor that trades analysis rate, cascade depth and the HTP performance mode for watts."""
