#!/usr/bin/env python3
# Sums the kernel durations of an `ncu --csv --metrics gpu__time_duration.sum` log by kernel name:
#   ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
#     bundle/bin/sala-bench ... > decode.csv && python3 bench/ncu_kernel_times.py decode.csv
import csv,sys,collections
rows=list(csv.reader(open(sys.argv[1])))
# find header
h=None
for i,r in enumerate(rows):
    if 'Kernel Name' in r: h=i;break
hdr=rows[h]; ki=hdr.index('Kernel Name'); vi=hdr.index('Metric Value'); ui=hdr.index('Metric Unit')
agg=collections.defaultdict(lambda:[0,0.0]); tot=0
for r in rows[h+1:]:
    if len(r)<=vi: continue
    try: v=float(r[vi].replace(',',''))
    except: continue
    if r[ui]=='msecond': v*=1e3
    elif r[ui]=='nsecond': v/=1e3
    elif r[ui]=='second': v*=1e6
    name=r[ki][:90]
    agg[name][0]+=1; agg[name][1]+=v; tot+=v
print('total kernels',sum(a[0] for a in agg.values()),'total us %.1f'%tot)
for n,(c,v) in sorted(agg.items(),key=lambda x:-x[1][1]):
    print('%8.1f us %4d  %s'%(v,c,n))
