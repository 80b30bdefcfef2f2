"""Display widgets of the console. Each takes what it shows as attributes (snapshots from
console.sources) and renders it; none fetches anything."""
