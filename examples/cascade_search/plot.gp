# Plots of a cascade_search run (PNG):
#   gnuplot -e "dir='cascade-search-out'; out='docs/img'; lambda=1; seed=100" examples/cascade_search/plot.gp
# writes out/search-accuracy.png (coarse accuracy against trainable parameters,
# mean and spread over seeds) and out/search-gates.png (softmax(alpha) of every
# searched module over the search with penalty weight `lambda`, seed `seed`).
if (!exists("dir")) dir = 'cascade-search-out'
if (!exists("out")) out = 'docs/img'
if (!exists("lambda")) lambda = 1
if (!exists("seed")) seed = 100
set datafile separator ','
set terminal pngcairo size 900,560 noenhanced font ',10'

# 1. Accuracy against trainable parameters (log scale; "all frozen" trains none and is the dashed line).
set output out.'/search-accuracy.png'
set title 'Cascade on corruption B: coarse-intent accuracy against trainable parameters (mean +- sd over seeds)'
set xlabel 'trainable parameters, % of full fine-tuning (log scale)'
set ylabel 'coarse accuracy on the test set (%)'
set logscale x
set xrange [3:200]
set grid
set key off
stats dir.'/summary.csv' every ::1 using 4 nooutput
frozen = STATS_min
stats dir.'/summary.dat' using 1 nooutput
blocks = STATS_blocks
set key outside right top
set datafile separator whitespace
set arrow from 3, frozen to 200, frozen nohead dashtype 2 lc rgb '#888888'
set label 'all frozen (0 trainable)' at 3.3, frozen + 0.3 tc rgb '#666666'
plot for [i = 0:blocks - 1] dir.'/summary.dat' index i using ($1 > 0 ? $1 : NaN):3:4 with yerrorbars pt 7 ps 1.3 \
     title columnheader(1)
set datafile separator ','
unset arrow
unset label
unset logscale x
unset xrange

# 2. Gate trajectories: one panel per searched module, one line per candidate.
set output out.'/search-gates.png'
set terminal pngcairo size 1100,640 noenhanced font ',9'
set multiplot layout 2,3 title sprintf('softmax(alpha) during the search, lambda = %g, seed %d', lambda, seed)
set xlabel 'search step'
set ylabel 'gate'
set yrange [0:1]
set key inside top right
names = 'enhancer.block0 enhancer.linear1 recogniser.block0 recogniser.linear1 understander.block0 understander.linear1'
do for [m = 0:5] {
    set title word(names, m + 1)
    c = 4 + 3 * m
    plot dir.'/gates.csv' every ::1 using ((abs($1 - lambda) < 1e-9 && $2 == seed) ? $3 : NaN):c with lines lw 2 title 'Frozen', \
         '' every ::1 using ((abs($1 - lambda) < 1e-9 && $2 == seed) ? $3 : NaN):(column(c + 1)) with lines lw 2 title 'Adapter<16>', \
         '' every ::1 using ((abs($1 - lambda) < 1e-9 && $2 == seed) ? $3 : NaN):(column(c + 2)) with lines lw 2 title 'FineTune'
}
unset multiplot
