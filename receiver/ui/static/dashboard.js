// receiver's dashboard: the little the server cannot do. No inline script (the page's CSP).

// Times arrive as UTC ISO in <time datetime>: show the viewer's local time, UTC on hover.
function localTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const when = new Date(el.dateTime);
    if (!Number.isNaN(when.getTime())) {
      el.title = el.dateTime;
      el.textContent = when.toLocaleString();
    }
  }
}
localTimes(document);

// Ids are one click to copy (they are also shown whole and select-all on click).
document.addEventListener("click", (e) => {
  const button = e.target.closest("button[data-copy]");
  if (!button || !navigator.clipboard) return;
  navigator.clipboard.writeText(button.dataset.copy).then(() => {
    button.textContent = "copied";
    setTimeout(() => { button.textContent = "copy"; }, 1200);
  });
});

// Time filters: typed and shown in the viewer's zone, sent as UTC. The server fills each
// input with the UTC time (what a page without script shows) and `data-utc` with the instant.
function localInputValue(when) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())}` +
    `T${pad(when.getHours())}:${pad(when.getMinutes())}:${pad(when.getSeconds())}`;
}
for (const input of document.querySelectorAll("input[data-utc]")) {
  const when = new Date(input.dataset.utc);
  if (input.dataset.utc && !Number.isNaN(when.getTime())) input.value = localInputValue(when);
  input.closest("label")?.setAttribute("title", `In your time zone (${Intl.DateTimeFormat().resolvedOptions().timeZone})`);
}
document.addEventListener("submit", (e) => {
  for (const input of e.target.querySelectorAll("input[data-utc]")) {
    const when = new Date(input.value); // a datetime-local value is local time
    if (!input.value || Number.isNaN(when.getTime())) continue;
    const sent = document.createElement("input");
    sent.type = "hidden";
    sent.name = input.name;
    sent.value = when.toISOString();
    input.removeAttribute("name");
    e.target.appendChild(sent);
  }
});

// Charts (the overview): uPlot, fed by the JSON in each chart's data-points (x: epoch seconds).
const drawn = new Map(); // chart element -> its uPlot, destroyed before the element is replaced
const SERIES = {
  activity: [["callbacks", "--accent"], ["delivered", "--ok"], ["failed sends", "--bad"]],
  latency: [["p50 ms", "--accent"], ["p99 ms", "--warn"]],
};

function drawCharts(root) {
  if (typeof uPlot === "undefined") return;
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const axis = { stroke: color("--muted"), grid: { stroke: color("--line") }, ticks: { stroke: color("--line") } };
  for (const el of root.querySelectorAll("[data-chart]")) {
    const series = SERIES[el.dataset.chart] || [];
    const opts = {
      width: Math.max(280, el.clientWidth),
      height: 190,
      scales: { x: { time: true } },
      axes: [axis, axis],
      legend: { live: false },
      // Latency has points: a minute alone between empty ones is a dot, not nothing.
      series: [{}, ...series.map(([label, stroke]) => ({
        label, stroke: color(stroke), width: 2, spanGaps: true,
        points: { show: el.dataset.chart === "latency", size: 6 },
      }))],
    };
    el.replaceChildren();
    drawn.set(el, new uPlot(opts, JSON.parse(el.dataset.points), el));
  }
}

// Parts of a page marked data-live="URL" follow the service: every data-every seconds the URL
// is fetched and the element of the same id in the answer replaces this one's content. An
// answer without data-live on it (a job now settled) ends the updates; one without the
// element at all (the session ended: the sign-in form) says so.
function follow(el) {
  const every = Number(el.dataset.every || 5) * 1000;
  const tick = async () => {
    if (document.hidden) { setTimeout(tick, every); return; }
    let fresh = null;
    try {
      const answer = await fetch(el.dataset.live, { credentials: "same-origin" });
      if (answer.ok) {
        const doc = new DOMParser().parseFromString(await answer.text(), "text/html");
        fresh = doc.getElementById(el.id);
        if (!fresh) {
          const note = document.createElement("p");
          note.className = "error";
          note.setAttribute("role", "alert");
          note.textContent = "Updates stopped: the session has ended. Reload to sign in again.";
          el.prepend(note);
          return;
        }
      }
    } catch (e) {
      fresh = null; // the service is restarting or the network blinked: try again next time
    }
    if (fresh) {
      for (const [chart, plot] of drawn) {
        if (el.contains(chart)) { plot.destroy(); drawn.delete(chart); }
      }
      const open = [...el.querySelectorAll("details")].map((d) => d.open);
      el.replaceChildren(...fresh.childNodes);
      el.querySelectorAll("details").forEach((d, i) => { if (i < open.length) d.open = open[i]; });
      localTimes(el);
      drawCharts(el);
      if (!fresh.hasAttribute("data-live")) { el.removeAttribute("data-live"); return; }
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

drawCharts(document);
document.querySelectorAll("[data-live]").forEach(follow);
