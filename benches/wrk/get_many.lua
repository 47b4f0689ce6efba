-- wrk script: GET /stock?skus=... for 10 SKUs per request.
local list = {}
for i = 0, 9 do list[#list + 1] = "sku-" .. i end
wrk.path = "/stock?skus=" .. table.concat(list, ",")
